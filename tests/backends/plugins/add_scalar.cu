// A tiny TensorRT plugin library for the tests: AddScalarPlugin (version "1"), y = x + scalar.
//
// One IPluginV3 (core, build and runtime capabilities) over float32 tensors of any shape in
// linear format, a creator with one field, "scalar" (float32), and the two entry points
// TensorRT's IPluginRegistry::loadLibrary looks for (setLoggerFinder, getCreators). An ONNX node
// of op type AddScalarPlugin with a float attribute `scalar` reaches it through the ONNX
// parser's plugin fallback. Built by tests/backends/test_tensorrt.py with nvcc where TensorRT's
// headers are found:
//     nvcc -shared -Xcompiler -fPIC -I TENSORRT_INCLUDE add_scalar.cu -o libadd_scalar.so
#include <NvInferRuntime.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

using namespace nvinfer1;

// A named namespace: nvcc's generated stub cannot tell an anonymous one from nvinfer1's.
namespace add_scalar_plugin
{
char const* const kNAME = "AddScalarPlugin";
char const* const kVERSION = "1";
char const* const kNAMESPACE = "";

__global__ void addScalar(float const* in, float* out, int64_t n, float scalar)
{
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n)
    {
        out[i] = in[i] + scalar;
    }
}

int64_t volume(Dims const& dims)
{
    int64_t n = 1;
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        n *= dims.d[i];
    }
    return n;
}

class AddScalar : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    explicit AddScalar(float scalar)
        : mScalar(scalar)
    {
        mField = PluginField("scalar", &mScalar, PluginFieldType::kFLOAT32, 1);
        mFields.nbFields = 1;
        mFields.fields = &mField;
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override { return new AddScalar(mScalar); }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kNAME; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVERSION; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNAMESPACE; }

    // IPluginV3OneBuild
    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
        int32_t) noexcept override
    {
        return 0;
    }
    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != 1)
        {
            return -1;
        }
        outputTypes[0] = inputTypes[0];
        return 0;
    }
    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
        DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbOutputs != 1 || nbInputs != 1)
        {
            return -1;
        }
        outputs[0] = inputs[0];
        return 0;
    }
    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override
    {
        return inOut[pos].desc.type == DataType::kFLOAT && inOut[pos].desc.format == TensorFormat::kLINEAR;
    }
    int32_t getNbOutputs() const noexcept override { return 1; }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override
    {
        return 0;
    }
    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        int64_t const n = volume(inputDesc[0].dims);
        int32_t const threads = 256;
        int64_t const blocks = (n + threads - 1) / threads;
        if (n > 0)
        {
            addScalar<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
                static_cast<float const*>(inputs[0]), static_cast<float*>(outputs[0]), n, mScalar);
        }
        return cudaPeekAtLastError() == cudaSuccess ? 0 : -1;
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mFields; }

private:
    float mScalar;
    PluginField mField;
    PluginFieldCollection mFields{};
};

class AddScalarCreator : public IPluginCreatorV3One
{
public:
    AddScalarCreator()
    {
        mField = PluginField("scalar", nullptr, PluginFieldType::kFLOAT32, 1);
        mFields.nbFields = 1;
        mFields.fields = &mField;
    }
    IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        float scalar = 0.F;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (std::strcmp(field.name, "scalar") == 0 && field.type == PluginFieldType::kFLOAT32 && field.data)
            {
                scalar = *static_cast<float const*>(field.data);
            }
        }
        return new AddScalar(scalar);
    }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mFields; }
    AsciiChar const* getPluginName() const noexcept override { return kNAME; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVERSION; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNAMESPACE; }

private:
    PluginField mField;
    PluginFieldCollection mFields{};
};

AddScalarCreator gCreator;
IPluginCreatorInterface* gCreators[] = {&gCreator};
} // namespace add_scalar_plugin

extern "C" void setLoggerFinder(ILoggerFinder*) {}

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = 1;
    return add_scalar_plugin::gCreators;
}
